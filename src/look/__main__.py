from look.cli import main

raise SystemExit(main())
