"""What the tests share that is not a fixture: DICOM files made from the fixture films
(``dicom_factory``, ``corpus``), real processes and peers (``processes``, ``orthanc``, ``listener``),
private servers and scratch databases (``services``) and database rows (``records``)."""
