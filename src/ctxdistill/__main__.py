from ctxdistill.cli import main

raise SystemExit(main())
