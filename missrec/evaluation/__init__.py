"""Full-ranking evaluation: metrics, the cold-item protocol and few-interaction views, the run report, statistics."""
