"""Shared by the phase tests: run a train step on one fixed batch until the loss halves."""


def steps_until_halved(step, state, batch, max_steps: int):
    """(state, losses): `step(state, batch)` repeated until the loss is at most half the first one, or max_steps."""
    losses = []
    for _ in range(max_steps):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
        if losses[-1] <= losses[0] / 2:
            break
    return state, losses
