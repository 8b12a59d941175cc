"""The engine: the reconciler that drives VEs to their desired state, the
scheduler it places with, and the database lock that lets exactly one of
several servers run it."""
