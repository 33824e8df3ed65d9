"""Score checkpoints the way the daemon runs them: the command line over nilmd.training.report
(see its docstring and `--help`)."""

from nilmd.training.report import main

if __name__ == "__main__":
    main()
