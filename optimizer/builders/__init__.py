"""Builders of model families: they train (or convert) models and write them where the zoo finds them.

They sit above the evaluator (a builder scores its own models while it trains them), and beside the zoo rather than
under it: ``optimizer.zoo`` is data (tiny models, task files, where a family lives) that the recipe layer reads,
so it imports nothing from here.
"""
