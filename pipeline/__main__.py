"""`python -m pipeline` is the `synops` command."""

from pipeline.cli import main

main()
