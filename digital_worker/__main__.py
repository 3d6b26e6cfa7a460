from digital_worker.cli import main

raise SystemExit(main())
