"""`python -m mlops_cli` runs the same app as the `mlops` console script."""

from mlops_cli.app import main

raise SystemExit(main())
