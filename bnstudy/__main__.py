from bnstudy.commands import main

raise SystemExit(main())
