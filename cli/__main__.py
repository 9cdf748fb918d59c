"""`python -m cli ...` is the `reenact` command."""

from cli.main import main

raise SystemExit(main())
