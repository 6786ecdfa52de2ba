"""Prices (the dated catalog) and costing (pricing a counterfactual chain): one place for what tokens cost."""
