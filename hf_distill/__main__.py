# Copyright 2026 The hf-distill authors. Licensed under the Apache License, Version 2.0.
"""`python -m hf_distill ...`: the `hf-distill` command line (`hf_distill.cli`)."""

from .cli import main


if __name__ == "__main__":
    main()
