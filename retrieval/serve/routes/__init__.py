"""The API's routers, one module per area: service (health, indexes, stats, the page),
search (one handler per query kind) and images (pictures and heatmaps by id)."""
