"""`python -m frugalstream ...` is the `frugalstream` command."""

from frugalstream.tools.cli import main

raise SystemExit(main())
