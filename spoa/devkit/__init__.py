"""Development tooling: signing keys, token minting and a loopback issuer."""
