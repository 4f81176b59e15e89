"""fhir-bridge: second-opinion exchange over an IHE MHD / ANS PDSm FHIR R4 national record."""

__version__ = "0.1.0"
