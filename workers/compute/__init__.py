"""Pure: features, clusters (and the rules file), aggregates and KPI cards, channel patterns."""
