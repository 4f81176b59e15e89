"""The opinion as a person reads it: the view, the layout both formats share, the HTML and the PDF, and the
presentedForm attachments they become (forms). Pure functions of the view: no file, no clock."""
