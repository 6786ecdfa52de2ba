"""Accountant: prices usage, attributes savings, keeps the ledger, enforces budgets."""
