"""Modules: layer kinds (feature axis, weight layout, fold and shrink) and what the stages need to know about a model."""
