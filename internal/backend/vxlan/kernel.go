package vxlan

import (
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// checksumFixed lists, per kernel line, the first release with the fix for
// the VXLAN TX checksum bug (kubernetes#88986/#91519: a NATed encapsulated
// packet leaves with a wrong UDP checksum). 5.7 and later have it.
var checksumFixed = map[[2]int]int{
	{5, 6}:  13,
	{5, 4}:  41,
	{4, 19}: 123,
	{4, 14}: 181,
}

// hasChecksumBug reports whether a kernel release string (uname -r, e.g.
// "5.4.40-generic" or "6.18.44") predates the fix. An unparsable release is
// taken as buggy: the workaround costs speed, the bug costs connectivity.
func hasChecksumBug(release string) bool {
	parts := strings.SplitN(release, ".", 3)
	if len(parts) < 2 {
		return true
	}
	major, err1 := strconv.Atoi(parts[0])
	minor, err2 := strconv.Atoi(leadingDigits(parts[1]))
	if err1 != nil || err2 != nil {
		return true
	}
	if major > 5 || (major == 5 && minor >= 7) {
		return false
	}
	fixed, ok := checksumFixed[[2]int{major, minor}]
	if !ok || len(parts) < 3 {
		return true
	}
	patch, err := strconv.Atoi(leadingDigits(parts[2]))
	return err != nil || patch < fixed
}

func leadingDigits(s string) string {
	i := 0
	for i < len(s) && s[i] >= '0' && s[i] <= '9' {
		i++
	}
	return s[:i]
}

// kernelRelease is uname -r of the running kernel.
func kernelRelease() string {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return ""
	}
	return unix.ByteSliceToString(u.Release[:])
}
