"""`python -m tune_age` runs the same CLI as `tune-age`."""

from .cli import main

raise SystemExit(main())
