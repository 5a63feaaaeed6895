"""The ``vmq`` command line and what it runs on top of the backend: calibration data and image folders, evaluation,
training of the reference models, reports and plots. Nothing in :mod:`vmq_fx.pt2e` imports from here."""
