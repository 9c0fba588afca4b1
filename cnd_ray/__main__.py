from cnd_ray.cli import main

raise SystemExit(main())
