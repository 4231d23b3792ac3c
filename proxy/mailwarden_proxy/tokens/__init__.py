"""Access tokens: providers behind one interface, and a single-flight cache."""
