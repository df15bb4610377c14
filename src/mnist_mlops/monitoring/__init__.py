"""Monitoring: is the service still seeing digits like those it was trained on, how accurate is
it on the labels people gave, and is it time to retrain?

`reference` (what the champion was trained and tested on), `drift` (statistical tests of a
window of the prediction log against it), `accuracy` (live accuracy from the labels),
`check` (the decision), `report` (the HTML page). No TensorFlow: the monitor reads logs and
the reference logged with each model, so a check over 100,000 predictions takes seconds.
"""
