"""`python -m actsparse_deploy` runs the `actsparse` command line.

Interrupts are handled before the heavy imports (torch, onnx): a Ctrl-C while
the command starts is one line on stderr and exit code 130 (143 for SIGTERM),
never a traceback from inside ``import torch``. ``main`` is also the right
console-script entry point for that reason.
"""

import os
import signal


def _while_starting(signum: int, frame: object) -> None:
    # nothing is written yet: leave at once, without unwinding half-done imports
    name, code = ("SIGINT", 130) if signum == signal.SIGINT else ("SIGTERM", 143)
    verb = "interrupted" if signum == signal.SIGINT else "terminated"
    os.write(2, f"{verb} ({name}) while starting: nothing was written\n".encode())
    os._exit(code)


def main() -> None:
    signal.signal(signal.SIGINT, _while_starting)
    signal.signal(signal.SIGTERM, _while_starting)
    from actsparse_deploy.app.cli import main as cli_main  # the heavy imports

    cli_main()  # exits with the command's code


if __name__ == "__main__":
    main()
