"""Lineage: from one answer back to the data, code, labels and decisions that produced it.

`card` gathers the pieces that already exist (the prediction log, the feedback store, the
registry's version tags, the training run's tags, params and data listing, the monitor's runs)
into one card; `render` shows it in a terminal or as an HTML page. `mnist-mlops trace` and the
service's `GET /predictions/{id}` both use them.
"""
