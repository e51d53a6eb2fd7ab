"""``python -m service.client``: the same as the ``sepconv-classify`` entry point."""

from service.client.cli import main

raise SystemExit(main())
