"""Jobs: the verbs that orchestrate the launch layer and the core (quickstart, evaluate,
fairness; DESIGN.md, "Layers")."""
