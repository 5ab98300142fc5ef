"""What runs inside a worker process: the main loop and the model backends behind one interface."""
