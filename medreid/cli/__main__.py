from medreid.cli import main

raise SystemExit(main())
