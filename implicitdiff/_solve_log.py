"""Hooks through which every linear solve of the implicit rule runs.

Placeholder pass-throughs: `SolveLog` (recording solves, also under jit) plugs in here.
"""


def presolve(solver, operator, y_structure, direction):
    """Runs `solver.presolve`; records it when a `SolveLog` is active."""
    return solver.presolve(operator, y_structure)


def solve(solver, state, operator, b, direction):
    """Runs `solver.solve`; records it when a `SolveLog` is active."""
    return solver.solve(state, b)


def note_iterations(num_steps):
    """Called by iterative solvers inside `solve` with their (traced) step count."""
    return None
