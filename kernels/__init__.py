"""fastlego's Triton kernels, installed as `fastlego.kernels`.

One kernel family per file; each file exposes a launcher with the same signature as its twin in
`fastlego.reference` and a `not_supported_reasons` function that the dispatcher asks before
every call. Importing this package needs triton.
"""
