"""`python -m spoa` runs the jwtgate command line."""

from spoa.cli import main

raise SystemExit(main())
