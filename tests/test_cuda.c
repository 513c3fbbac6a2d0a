#include "ccr_test.h"
int main(void) { return 1; }
