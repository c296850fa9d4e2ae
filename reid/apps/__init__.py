"""The tools a site runs with a trained model, on its own box: fedreid-eval, fedreid-search, fedreid-export."""
