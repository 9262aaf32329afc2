"""Input data: reading and validating AnnData / MuData, preprocessing, pairing and sampling, device-resident data."""
