"""The runners of the evaluation attacks, one module per library: in-house (inhouse.py), foolbox (foolbox.py),
pyautoattack (autoattack.py). A runner is `(model, x, y, eps, resolved parameters) -> (x_adv, extra record
entries)`; the attack table (attacks/registry.py) names them, attacks/spec.py's Attack runs them."""
