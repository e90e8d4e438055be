"""The convolutional DEQ example: ``examples.deq.model`` (the classifier) and ``examples.deq.train`` (the script).

Import it from the repository root::

    from examples.deq.model import build_classifier
"""
