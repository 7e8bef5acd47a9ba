from torchdora.cli import main

raise SystemExit(main())
