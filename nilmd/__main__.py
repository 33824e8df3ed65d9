from nilmd.cli import main

raise SystemExit(main())
