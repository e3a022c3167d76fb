"""Language ID: detector backends, the ensemble rule, romanized detection, degeneracy."""
