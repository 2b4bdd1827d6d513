"""The archiver: every stream entry, byte for byte, into segments (a directory or an object
store), acknowledged after the upload; and the segments' reader."""
