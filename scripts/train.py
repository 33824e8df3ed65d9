"""Train WaveNILM v3 checkpoints: the command line over nilmd.training.train (see its docstring
and `--help`)."""

from nilmd.training.train import main

if __name__ == "__main__":
    main()
