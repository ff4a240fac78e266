"""Tools for developers and the demo: throwaway local servers and the guided demo. Nothing in the
daemons imports from here."""
