"""Flower-free core: the recommender algorithms behind one interface (algorithm.py), the training loop
every device and the central baseline run (train.py, central.py), metrics and named random streams."""
