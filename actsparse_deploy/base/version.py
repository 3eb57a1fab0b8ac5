"""The package version, in a module of its own so that every module (and the
command line's ``--version``) can read it without importing the package's API.

    >>> from actsparse_deploy.base.version import __version__
    >>> __version__.count(".")
    2
"""

__version__ = "0.1.0"
