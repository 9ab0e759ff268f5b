from sentinel_proxy.cli import main

raise SystemExit(main())
