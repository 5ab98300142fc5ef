"""stoker on a Ray cluster (the `ray` extra): one supervisor per node, and `stoker batch --ray`
moving the items. See docs/cluster.md."""
