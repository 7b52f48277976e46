"""`python -m mlops_cli.services.bench_tokenizers SETTINGS_JSON`: one child process of a thread sweep."""

import sys

from mlops_cli.services.bench_tokenizers import child_main

raise SystemExit(child_main(sys.argv[1:]))
