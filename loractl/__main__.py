from loractl.cli import main

raise SystemExit(main())
