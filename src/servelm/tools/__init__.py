"""What developers and operators run beside the server: the load generator behind
``servelm bench`` (``loadgen``) and the test doubles and tiny-model maker the suite
and ``servelm models ggufgen`` use (``testing``)."""
